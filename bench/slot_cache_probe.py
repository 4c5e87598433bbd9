import json, subprocess, time, urllib.request, sys
B="/root/.cache/modelfleet/llama.cpp-11434.0.0-cpu2/bin/llama-server"
M="/root/.cache/modelfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf"
port=18931
p=subprocess.Popen([B,"-m",M,"--port",str(port),"--host","127.0.0.1","-np","2","-c","8192","-t","1","--fit","off","--threads-http","16"],stdout=subprocess.DEVNULL,stderr=open("srv.log","w"))
print("pid",p.pid,flush=True)
def post(path,body):
    r=urllib.request.Request(f"http://127.0.0.1:{port}{path}",json.dumps(body).encode(),{"Content-Type":"application/json"})
    return json.load(urllib.request.urlopen(r,timeout=300))
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health",timeout=2); break
    except Exception: time.sleep(0.2)
sysmsg="You are a careful assistant. "+" ".join(f"Rule {i}: always answer politely and check facts number {i}." for i in range(40))
def chat(msgs, slot=None):
    b={"messages":msgs,"max_tokens":4,"temperature":0}
    if slot is not None: b["id_slot"]=slot
    t=time.time(); r=post("/v1/chat/completions",b); 
    return r["timings"]["cache_n"], r["timings"]["prompt_n"], round(r["timings"]["prompt_ms"]), round(time.time()-t,2)
A=[{"role":"system","content":sysmsg},{"role":"user","content":"hello A"}]
Bm=[{"role":"system","content":sysmsg},{"role":"user","content":"hello B"}]
C=[{"role":"system","content":"Different system prompt entirely. "*30},{"role":"user","content":"hi"}]
print("A slot0", chat(A,0),flush=True)
print("A again slot1 (other slot)", chat(A,1),flush=True)
print("B slot0 (shared system)", chat(Bm,0),flush=True)
print("C slot0 (overwrites slot0)", chat(C,0),flush=True)
print("A slot0 again after overwrite (prompt cache ram?)", chat(A,0),flush=True)
print("C no slot", chat(C),flush=True)
print("A no slot", chat(A),flush=True)
p.terminate(); p.wait()
