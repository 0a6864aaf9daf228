"""Structural check of docker/compose.yaml for machines without the compose
plugin: it parses, every build points at an existing Dockerfile and target,
and the services and profiles are wired as documented."""
import pathlib
import re
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
doc = yaml.safe_load((root / "docker" / "compose.yaml").read_text())
services = doc["services"]
assert set(services) == {"postgres", "polar-meterd", "polar-emulator"}, services.keys()
for name, svc in services.items():
    build = svc["build"]
    dockerfile = (root / "docker" / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
    if "target" in build:
        stages = re.findall(r"^FROM .* AS (\w+)", dockerfile.read_text(), re.M)
        assert build["target"] in stages, f"{name}: no stage {build['target']} in {stages}"
    for port in svc.get("ports", []):
        assert port.startswith("127.0.0.1:"), f"{name}: {port} must bind to 127.0.0.1"
assert services["polar-emulator"]["profiles"] == ["emulator"]
assert services["polar-meterd"]["depends_on"]["postgres"]["condition"] == "service_healthy"
assert "polar_meterd" in services["polar-meterd"]["environment"]["DATABASE_URL"]
init = root / "docker" / "initdb.d" / "10-polar-meter.sh"
assert "IN ROLE polar_meter_sidecar" in init.read_text()
print("1 passed, 0 failed: docker/compose.yaml is well formed")
