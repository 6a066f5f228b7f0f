"""``python -m benchmarks.peers {torch_rpc,ray_ps} [--quick]``: measure one peer alone, in
its own processes as the suite runs it, and print its figures."""

from __future__ import annotations

import argparse
import json

from benchmarks.peers import FULL, QUICK, RAY, TORCH_RPC, figures, measure

PEERS = {peer.key: peer for peer in (TORCH_RPC, RAY)}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    args = parser.parse_args()
    samples = measure(PEERS[args.peer], QUICK if args.quick else FULL)
    print(json.dumps(samples and figures(samples), indent=2))
