"""cluster.yaml and examples/cluster-onprem.yaml pass Ray's own cluster-launcher validation.

``prepare_config`` + ``validate_config`` are what ``ray up`` runs before it touches a cloud. For
the aws provider, Ray 2.60's ``prepare_config`` only merges ``ray/autoscaler/aws/defaults.yaml``
(a file in the wheel); the network/credential step (``bootstrap_aws``: subnets, security groups,
IAM) comes later in ``ray up`` and is not called here, so this runs offline.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "cluster.yaml", ROOT / "examples" / "cluster-onprem.yaml"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_the_config(path):
    config = prepare_config(load(path))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_installs_cpu_torch_then_this_project(path):
    config = prepare_config(load(path))
    # prepare_config prepends setup_commands to the head's and the workers' own lists
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        torch_at = next(i for i, c in enumerate(commands) if "install torch==" in c)
        project_at = next(i for i, c in enumerate(commands) if "install quantize-all" in c)
        assert torch_at < project_at
        assert "--index-url https://download.pytorch.org/whl/cpu" in commands[torch_at]


def test_aws_cluster_shape():
    config = prepare_config(load(ROOT / "cluster.yaml"))
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for n, t in config["available_node_types"].items()
               if n != config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"] == {"CPU": 0}
    assert len(workers) == 1 and workers[0]["min_workers"] == 0
    assert 0 < workers[0]["max_workers"] <= config["max_workers"]
    for node_type in config["available_node_types"].values():  # CPU only
        assert "GPU" not in node_type["resources"]
        assert not node_type["node_config"]["InstanceType"].startswith(("p", "g", "inf", "trn"))


def _public(cidr: str) -> bool:
    return ipaddress.ip_network(cidr, strict=False).prefixlen == 0


def test_aws_dashboard_is_not_open_to_the_internet():
    config = load(ROOT / "cluster.yaml")
    # Ray's own auto-created group opens SSH to 0.0.0.0/0; every node type brings its own group
    # instead, so Ray adds no ingress rule at all.
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), name
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        covers_8265 = rule.get("FromPort", -1) <= 8265 <= rule.get("ToPort", 65535)
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        assert not (covers_8265 and any(map(_public, cidrs))), rule
    text = (ROOT / "cluster.yaml").read_text()
    assert "--port 22 --cidr 203.0.113.0/24" in text        # the documented admin-only SSH rule
    assert "ray dashboard cluster.yaml" in text
    assert "8265" not in " ".join(config["head_start_ray_commands"])


def test_onprem_cluster_lists_its_machines_and_keeps_the_dashboard_local():
    raw = load(ROOT / "examples" / "cluster-onprem.yaml")
    assert raw["provider"]["type"] == "local"
    ips = [raw["provider"]["head_ip"], *raw["provider"]["worker_ips"]]
    assert all(ipaddress.ip_address(ip) for ip in ips) and len(set(ips)) == len(ips)
    config = prepare_config(raw)
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(ips) - 1
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
