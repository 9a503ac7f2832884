# A stand-in inference worker with the phases of a real engine's cold start:
#   import torch + transformers -> from_pretrained(MODEL_DIR) straight to the GPU -> allocate static KV
#   caches (transformers StaticCache, one per batch size, like an engine's preallocated KV pool) ->
#   torch.compile the decode step (default mode "reduce-overhead": Inductor/Triton kernels + CUDA graphs,
#   one specialisation and one graph set per batch size, like vLLM's per-batch-size graph capture) ->
#   warm-up greedy decoding over batch sizes x prompt lengths -> reference decode -> CTL_DIR/ready.json.
# Then it serves: when CTL_DIR/go<N> appears it reruns the reference decode (batch 1, 32 new tokens,
# fixed prompt of token ids) and writes CTL_DIR/done<N>.json with the token ids and the time.
#   python3 worker.py MODEL_DIR CTL_DIR
# Knobs (environment): WORKER_COMPILE_MODE (reduce-overhead | max-autotune-no-cudagraphs | max-autotune |
#   default | none), WORKER_BATCHES (1,2,4,8), WORKER_MAX_LEN (2048), WORKER_PROMPT_LENS (16,128,512),
#   WORKER_WARM_NEW (8), WORKER_DEVICE (cuda). Start it with setsid and </dev/null for CRIU.
# Separated mode (snapreg's weights service): WORKER_WEIGHTS_SOCKET=PATH moves every parameter into
# one service buffer (WORKER_WEIGHTS_NAME) right after loading, before the KV pool, compile and graph
# capture, so graphs point at the service's memory. CTL_DIR/quiesce then makes the worker unmap and
# release the weights (CTL_DIR/quiesced.json), wait for snapctl pull-restore's signal, and map them
# again at the same address (CTL_DIR/resumed.json).
import os, sys, time, json, signal
T0 = time.time()
# Compile in this process: no Inductor compile-worker subprocesses to carry through CRIU.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformers
from transformers import AutoModelForCausalLM, StaticCache
T_IMPORT = time.time()

model_dir, ctl = sys.argv[1], sys.argv[2]
MODE = os.environ.get("WORKER_COMPILE_MODE", "reduce-overhead")
BATCHES = [int(x) for x in os.environ.get("WORKER_BATCHES", "1,2,4,8").split(",")]
MAX_LEN = int(os.environ.get("WORKER_MAX_LEN", "2048"))
PROMPT_LENS = [int(x) for x in os.environ.get("WORKER_PROMPT_LENS", "16,128,512").split(",")]
WARM_NEW = int(os.environ.get("WORKER_WARM_NEW", "8"))
DEV = torch.device(os.environ.get("WORKER_DEVICE", "cuda"))
REF_NEW = 32
ON_GPU = DEV.type == "cuda"
def sync():
    if ON_GPU: torch.cuda.synchronize()
def log(*a):
    print(f"[worker {time.time()-T0:7.2f}s]", *a, flush=True)

log(f"torch {torch.__version__} transformers {transformers.__version__} mode={MODE} batches={BATCHES} "
    f"max_len={MAX_LEN} prompt_lens={PROMPT_LENS}")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if ON_GPU else torch.float32,
                                             device_map=str(DEV))
model.eval()
sync()
WEIGHTS_SOCKET = os.environ.get("WORKER_WEIGHTS_SOCKET")
weight_bufs = []
if WEIGHTS_SOCKET:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "weights", "python"))
    import snapreg_weights as sw
    wclient = sw.Client(WEIGHTS_SOCKET)
    t = time.time()
    weight_bufs = sw.adopt_module(torch, model, wclient, os.environ.get("WORKER_WEIGHTS_NAME", "model"))
    sw.install_resume_handler(signal.SIGUSR2)
    print(f"weights moved into the service in {time.time()-t:.2f}s: "
          f"{[(b.name, b.size, hex(b.ptr)) for b in weight_bufs]}", flush=True)
T_LOAD = time.time()
cfg = model.config
VOCAB = cfg.vocab_size
n_params = sum(p.numel() for p in model.parameters())
log(f"loaded {n_params/1e6:.1f}M params in {T_LOAD-T_IMPORT:.2f}s")

# Static KV caches, allocated up front (an engine's KV pool), one per batch size.
kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
caches = {}
for b in BATCHES:
    c = StaticCache(config=cfg, max_cache_len=MAX_LEN)
    c.early_initialization(batch_size=b, num_heads=kv_heads, head_dim=head_dim, dtype=model.dtype, device=DEV)
    caches[b] = c
sync()
T_KV = time.time()
kv_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for c in caches.values() for l in c.layers)
log(f"KV caches {kv_bytes/2**30:.2f} GiB in {T_KV-T_LOAD:.2f}s")

def step(input_ids, position_ids, cache):
    out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :].argmax(-1)

if MODE == "none":
    step_c = step
else:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(BATCHES))
    step_c = torch.compile(step, mode=None if MODE == "default" else MODE, dynamic=False, fullgraph=False)
USE_GRAPHS = MODE in ("reduce-overhead", "max-autotune") and ON_GPU

PROMPT = [(i * 7919 + 13) % VOCAB for i in range(1, 17)]     # fixed 16-token prompt (token ids)

@torch.no_grad()
def generate(b, prompt, n_new, compiled=True):
    """Greedy decode: eager prefill into the static cache, then n_new-1 (compiled) decode steps."""
    cache = caches[b]
    cache.reset()
    ids = torch.tensor([[(t + r) % VOCAB for t in prompt] for r in range(b)], device=DEV)
    L = ids.shape[1]
    pos = torch.arange(L, device=DEV).unsqueeze(0).expand(b, L)
    logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    tok = logits[:, -1, :].argmax(-1)
    toks = [tok]
    f = step_c if compiled else step
    for i in range(1, n_new):
        p = torch.full((b, 1), L + i - 1, device=DEV, dtype=torch.long)
        if compiled and USE_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()
        tok = f(tok.view(b, 1), p, cache).clone()
        toks.append(tok)
    out = torch.stack(toks, 1)
    sync()
    return out

@torch.no_grad()
def logits_sum():
    """Bitwise fingerprint of the weights' path: full-prompt logits without a cache, summed in fp64."""
    ids = torch.tensor([PROMPT], device=DEV)
    lg = model(input_ids=ids, use_cache=False).logits.double()
    return [float(lg.sum()), float(lg.abs().sum())]

def check():
    """What a request does: batch-1 greedy decode of the fixed prompt, plus the largest batch and a logits sum."""
    t = time.time()
    toks = generate(1, PROMPT, REF_NEW)[0].tolist()
    dt = time.time() - t
    big = generate(BATCHES[-1], PROMPT, REF_NEW).tolist()
    return toks, dt, big, logits_sum()

def rand_prompt(L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (L,), generator=g).tolist()

# Warm-up = compile (first decode step per batch size) + CUDA-graph capture (cudagraph trees record on
# the following calls) + prefill at several lengths.
warm = []
T_W0 = time.time()
for b in BATCHES:
    for j, L in enumerate(PROMPT_LENS):
        t = time.time()
        generate(b, rand_prompt(L, 100 * b + j), WARM_NEW)
        warm.append({"batch": b, "prompt_len": L, "s": round(time.time() - t, 3)})
        log(f"warm-up batch {b} prompt {L}: {time.time()-t:.2f}s")
T_WARM = time.time()
ref, ref_s, ref_big, ref_lsum = check()
ref2, ref2_s, ref2_big, ref2_lsum = check()
T_READY = time.time()
# Not part of the cold start: the same decode without the compiled step (a numerics cross-check).
t = time.time()
eager = generate(1, PROMPT, REF_NEW, compiled=False)[0].tolist()
eager_s = time.time() - t
try:
    from torch._dynamo.utils import counters
    dyn = {"graph_breaks": sum(counters["graph_break"].values()),
           "unique_graphs": counters["stats"].get("unique_graphs", 0)}
except Exception as e:                                              # informational only
    dyn = {"err": repr(e)}
mem = {}
if ON_GPU:
    free, total = torch.cuda.mem_get_info()
    mem = {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
           "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
           "device_used_gib": round((total - free) / 2**30, 2)}
ready = {"pid": os.getpid(), "mode": MODE, "batches": BATCHES, "max_len": MAX_LEN, "prompt_lens": PROMPT_LENS,
         "params": n_params, "kv_gib": round(kv_bytes / 2**30, 2), **mem,
         "import_s": round(T_IMPORT - T0, 2), "load_s": round(T_LOAD - T_IMPORT, 2),
         "kv_alloc_s": round(T_KV - T_LOAD, 2), "compile_warmup_s": round(T_WARM - T_KV, 2),
         "ref_decode_s": round(ref_s, 3), "ref2_decode_s": round(ref2_s, 3),
         "total_s": round(T_READY - T0, 2), "warmup": warm, "dynamo": dyn,
         "prompt": PROMPT, "ref_tokens": ref, "ref_logits_sum": ref_lsum,
         "ref_stable": ref == ref2 and ref_big == ref2_big and ref_lsum == ref2_lsum,
         "eager_tokens_equal": eager == ref, "eager_decode_s": round(eager_s, 3)}
tmp = os.path.join(ctl, "ready.json.tmp")
json.dump(ready, open(tmp, "w"))
os.rename(tmp, os.path.join(ctl, "ready.json"))
log(f"ready: total {T_READY-T0:.2f}s; ref {ref[:8]}... stable={ready['ref_stable']} eager_equal={eager == ref}")

def put(name, obj):
    tmp = os.path.join(ctl, name + ".tmp")
    json.dump(obj, open(tmp, "w"))
    os.rename(tmp, os.path.join(ctl, name))

n = 0
while True:
    if weight_bufs and os.path.exists(os.path.join(ctl, "quiesce")):
        os.remove(os.path.join(ctl, "quiesce"))
        t = time.time()
        sync()
        wclient.quiesce(weight_bufs, signal.SIGUSR2)
        put("quiesced.json", {"quiesce_s": round(time.time() - t, 4), "ptrs": [hex(b.ptr) for b in weight_bufs]})
        log("quiesced; waiting for the resume signal")
        sw.wait_for_resume()
        t = time.time()
        wclient.resume(weight_bufs)
        put("resumed.json", {"resume_s": round(time.time() - t, 4), "ptrs": [hex(b.ptr) for b in weight_bufs]})
        log(f"resumed in {time.time()-t:.4f}s")
    if os.path.exists(os.path.join(ctl, f"go{n}")):
        t = time.time()
        try:
            toks, dt, big, lsum = check()
            res = {"tokens": toks, "equal": toks == ref, "decode_s": round(dt, 4),
                   "big_batch_equal": big == ref_big, "logits_equal": lsum == ref_lsum, "logits_sum": lsum,
                   "check_s": round(time.time() - t, 4)}
        except Exception as e:
            res = {"error": repr(e), "decode_s": round(time.time() - t, 4)}
        tmp = os.path.join(ctl, f"done{n}.json.tmp")
        json.dump(res, open(tmp, "w"))
        os.rename(tmp, os.path.join(ctl, f"done{n}.json"))
        log(f"go{n}: equal={res.get('equal')} big={res.get('big_batch_equal')} logits={res.get('logits_equal')} "
            f"{res['decode_s']}s {res.get('error', '')}")
        n += 1
    time.sleep(0.01)
