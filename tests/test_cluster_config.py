"""cluster.yaml and cluster-aws.yaml are configs `ray up` accepts: Ray's own schema check, raw (as the issue runs it)
and after Ray fills in its defaults (what `ray up` validates)."""
from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-aws.yaml"])
def test_cluster_config_passes_rays_validation(name):
    text = (REPO / name).read_text()
    config = yaml.safe_load(text)

    validate_config(copy.deepcopy(config))
    validate_config(prepare_config(config))
    # the launch shown writes results to a bucket (the normal case: workers need no mount), with the s3 extra
    # installed, and `ray job submit` beside `ray attach` where both are shown
    assert "--address auto" in text and "--results s3://my-bucket/" in text and "[torchao,hqq,s3]" in text
    assert "ray job submit" in text


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-aws.yaml"])
def test_every_node_starts_with_preloaded_idle_workers_and_says_so(name):
    """Each `ray start` of the config sets Ray's two settings for sweeper.node_preload and the label the launch reads
    (sweeper/local_ray.py): without them a node's trials start in new processes."""
    from sweeper.local_ray import PRELOAD_LABEL, PRELOAD_MODULE, SPARE_PROCESSES

    config = yaml.safe_load((REPO / name).read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2, starts
    for command in starts:
        assert f"RAY_preload_python_modules={PRELOAD_MODULE} " in command, command
        assert "RAY_enable_worker_prestart=1 " in command, command
        # room for the launch's own processes beside the preloaded ones (local_ray.SPARE_PROCESSES)
        assert f"RAY_num_workers_soft_limit=$(( $(nproc) + {SPARE_PROCESSES} )) " in command, command
        assert f"--labels={PRELOAD_LABEL}=1" in command, command
