"""Where a fresh process's time goes before a trial's real work: imports, CUDA context, the first model load,
lm-eval's task index, Ray's start. Each step is timed in order in one fresh process (run by driver.py startup).

    python3 benchmarks/gpu/startup_profile.py --model .gpu/h100/llama-4m
"""
import argparse
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--ray", action="store_true", help="also time ray.init / shutdown")
a = ap.parse_args()
T0 = time.perf_counter()
last = [T0]


def step(name):
    now = time.perf_counter()
    print(f"{name:42s} {now - last[0]:7.2f}s  (total {now - T0:6.2f}s)", flush=True)
    last[0] = now


import torch  # noqa: E402
step("import torch")
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
step("CUDA context")
import transformers  # noqa: E402,F401
step("import transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
step("import Auto* classes")
tok = AutoTokenizer.from_pretrained(a.model)
step("tokenizer")
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float16, device_map={"": 0})
torch.cuda.synchronize()
step("first from_pretrained fp16")
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float16, device_map={"": 0})
torch.cuda.synchronize()
step("second from_pretrained fp16")
import bitsandbytes  # noqa: E402,F401
step("import bitsandbytes")
m = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                         device_map={"": 0})
torch.cuda.synchronize()
step("first from_pretrained nf4")
x = m(torch.ones(1, 16, dtype=torch.long, device="cuda"))
torch.cuda.synchronize()
step("first forward nf4")
import lm_eval  # noqa: E402,F401
from lm_eval.models.huggingface import HFLM  # noqa: E402,F401
step("import lm_eval + HFLM")
os.environ["SWEEPER_TASK_INDEX_CACHE"] = "/tmp/startup-profile-index"
import shutil  # noqa: E402
shutil.rmtree("/tmp/startup-profile-index", ignore_errors=True)
from sweeper.stages.task_index import make_task_manager  # noqa: E402
make_task_manager()
step("lm-eval task index, cold (built, pickled)")
make_task_manager()
step("lm-eval task index, from the cache")
if a.ray:
    import ray  # noqa: E402
    step("import ray")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    step("ray.init (local)")
    ray.shutdown()
    step("ray.shutdown")
