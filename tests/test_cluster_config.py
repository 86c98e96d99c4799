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
