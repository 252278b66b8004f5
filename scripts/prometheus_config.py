"""Writes a Prometheus configuration from deploy/prometheus.yml: the gateway and Triton targets.

    python scripts/prometheus_config.py --gateway 127.0.0.1:9000 --triton 127.0.0.1:8002 \
        --out build/prometheus/prometheus.yml
"""

from __future__ import annotations

import argparse
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus.yml"


def render(gateway: str, triton: str, scrape_interval: str = "5s") -> str:
    # substitute (not safe_substitute): a field left unfilled is an error, not a broken config
    return Template(TEMPLATE.read_text()).substitute(gateway=gateway, triton=triton, scrape_interval=scrape_interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:9000", help="gateway metrics host:port")
    parser.add_argument("--triton", default="127.0.0.1:8002", help="Triton metrics host:port")
    parser.add_argument("--scrape-interval", default="5s", help="Prometheus duration, e.g. 5s")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.gateway, args.triton, args.scrape_interval))
    print(args.out)


if __name__ == "__main__":
    main()
