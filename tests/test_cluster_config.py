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
    # the launch shown writes results to the launching machine (workers need no mount); no URI until one is built
    assert "--address auto" in text and "--results /home/ubuntu/results/" in text and "--results s3://" not in text
