"""A deployment's worker on the GPU, placed by the controller, served through the router; then the same
load on an in-process AsyncEngine (no Ray between gateway and engine).

    python deploy/ray/router_vs_in_process.py [tiny-moe | llama3-8b | /path/to/checkpoint]

Prints where the worker runs (device, placement-group strategy, bundles) and, for 64 concurrent greedy
requests of 200 tokens, tokens/s and this process's CPU per token for both; writes gpu_check.json to $OUT
(or here).
"""
import asyncio, json, os, sys, time
import ray
import torch
from partita.cluster.spec import ClusterSpec
from partita.cluster.controller import start_controller, stop_controller
from partita.cluster.router import RayRouter
from partita.cluster.async_engine import AsyncEngine
from partita.cluster.worker_actor import engine_config
from partita.workers import SamplingParams

MODEL = sys.argv[1] if len(sys.argv) > 1 else "tiny-moe"
N, TOKENS = 64, 200
ray.init(include_dashboard=False, namespace="partita", log_to_driver=False)
spec = ClusterSpec.from_dict({"name": "gpu", "model": MODEL, "pools": [{"name": "g", "replicas": 1}],
                              "scheduler": {"max_model_len": 512, "max_num_seqs": 128, "max_num_batched_tokens": 4096},
                              "controller": {"reconcile_interval_s": 0.2}})
t0 = time.time()
c = start_controller(spec)
ready = ray.get(c.wait_ready.remote(500))
st = ray.get(c.status.remote())
pgs = {g["placement_group_id"]: g for g in ray.util.placement_group_table().values()}
w = st["workers"][0]
print("ready", ready, round(time.time() - t0, 1), "s; worker", w["worker_id"], w["device"],
      pgs[w["placement_group_id"]]["strategy"], list(pgs[w["placement_group_id"]]["bundles"].values()), flush=True)

async def load(client, tag):
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    async def one(i):
        n = 0
        async for out in client.generate(f"{tag}{i}", [5 + i % 50, 6, 7, 8], params):
            n += len(out.new_token_ids)
        return n
    await asyncio.gather(*[one(i) for i in range(8)])  # warm-up
    t = time.perf_counter(); cpu = time.process_time()
    total = sum(await asyncio.gather(*[one(1000 + i) for i in range(N)]))
    wall = time.perf_counter() - t
    return {"tokens": total, "tokens_per_s": round(total / wall), "gateway_cpu_us_per_token": round((time.process_time() - cpu) / total * 1e6, 1)}

async def main():
    router = await RayRouter.connect(c, spec)
    r = await load(router, "r")
    await router.aclose()
    return r
res = {"model": MODEL, "gpu": torch.cuda.get_device_name(0), "router_ray_per_request": asyncio.run(main())}
print(json.dumps(res), flush=True)
stop_controller(c)
async def local():
    eng = AsyncEngine.from_model(MODEL, device="cuda", config=engine_config(spec.scheduler, spec.model))
    try:
        return await load(eng, "l")
    finally:
        eng.shutdown()
res["in_process_async_engine"] = asyncio.run(local())
print(json.dumps(res), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gpu_check.json"), "w"), indent=1)
ray.shutdown()
