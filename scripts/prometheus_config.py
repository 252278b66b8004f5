"""Writes a Prometheus configuration from deploy/prometheus.yml: the gateway and Triton targets.

    python scripts/prometheus_config.py --gateway 127.0.0.1:9000 --triton 127.0.0.1:8002 \
        --out build/prometheus/prometheus.yml
"""

from __future__ import annotations

import argparse
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus.yml"


def render(gateway: str, triton: str, scrape_interval: str = "5s", gateway_workers: int = 1) -> str:
    """`gateway_workers`: a gateway run with --workers N serves worker i's metrics on port + i."""
    host, _, port = gateway.rpartition(":")
    targets = ", ".join(f'"{host}:{int(port) + i}"' for i in range(gateway_workers))
    # substitute (not safe_substitute): a field left unfilled is an error, not a broken config
    return Template(TEMPLATE.read_text()).substitute(gateway_targets=targets, triton=triton, scrape_interval=scrape_interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:9000", help="gateway metrics host:port")
    parser.add_argument("--gateway-workers", type=int, default=1, help="the gateway's --workers: scrapes port, port+1, ...")
    parser.add_argument("--triton", default="127.0.0.1:8002", help="Triton metrics host:port")
    parser.add_argument("--scrape-interval", default="5s", help="Prometheus duration, e.g. 5s")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.gateway, args.triton, args.scrape_interval, args.gateway_workers))
    print(args.out)


if __name__ == "__main__":
    main()
