"""Where `ray.init` spends its time on this machine: each variant in a fresh process, timed, with the first lines of
the head's logs. Run by hand on the device: python3 benchmarks/gpu/ray_start_probe.py > $OUT/ray_probe.txt
(`--api-server`: 3 rounds of the default start with and without the API server, alternating)"""
import os
import subprocess
import sys
import time

CODE = """
import time, logging, os
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
if os.environ.get("PROBE_NO_API_SERVER") == "1":  # as sweeper/local_ray.py starts a launch's private instance
    from ray._private.node import Node
    Node.start_api_server = lambda self, *a, **k: setattr(self, "_webui_url", None)
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, {extra}
         runtime_env={{"env_vars": {{"TOKENIZERS_PARALLELISM": "false"}}}})
t2 = time.perf_counter()
print(f"import ray {{t1 - t0:.2f}}s  ray.init {{t2 - t1:.2f}}s  resources {{ray.cluster_resources()}}", flush=True)
ray.shutdown()
"""
VARIANTS = [("default", {}, ""), ("usage stats off", {"RAY_USAGE_STATS_ENABLED": "0"}, ""),
            ("auth off", {"RAY_AUTH_MODE": "disabled"}, ""), ("num_cpus=4", {}, "num_cpus=4,"),
            ("default again", {}, "")]
if "--api-server" in sys.argv:  # with and without the API server (the dashboard process), alternating
    VARIANTS = [(f"{name} {i + 1}", env, "") for i in range(3)
                for name, env in (("API server", {}), ("no API server", {"PROBE_NO_API_SERVER": "1"}))[::1 - 2 * (i % 2)]]
for name, env, extra in VARIANTS:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CODE.format(extra=extra)], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)
    print(f"{name}: wall {time.perf_counter() - t:.2f}s rc {r.returncode}: {r.stdout.strip()} {r.stderr.strip()[-300:]}",
          flush=True)
logs = "/tmp/ray/session_latest/logs"
for f in ("gcs_server.out", "raylet.out"):
    p = os.path.join(logs, f)
    if os.path.exists(p):
        lines = open(p).read().splitlines()
        print(f"--- {f}: {len(lines)} lines; first and last 8")
        print("\n".join(lines[:8] + ["..."] + lines[-8:]))
