"""Benchmark: what the live view (viewer node) costs the acting agent.

One agent + osc_bridge chain (bench/acting_latency.py's: frames from this
script at 10 Hz, actions back, as real processes over real DDS) runs three
paired halves in one lifetime: without the viewer, with it (the viewer node
and its web viewer server with their defaults: the camera decimated, the
predictions one at a time; saving an .rrd), and without it again, so drift
between halves shows. For each half it prints the missed steps (frames
without an action) and the frame->action p99, as received here and as the
agent reports it. No browser is connected (a browser renders elsewhere, or on
cores the agent's machine can spare).

    .venv/bin/python bench/viewer_cost.py [--preset cpu] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from acting_latency import Chain  # noqa: E402

from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters  # noqa: E402


def free_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def start_viewer(log_dir: Path, extra: dict) -> NodeProcess:
    params = write_parameters(log_dir / 'viewer.yaml', 'viewer', {
        'view_port': free_tcp_port(), 'save': str(log_dir / 'bench.rrd'), **extra})
    viewer = NodeProcess('viewer', node_command('viewer', 'viewer', [params]),
                         log_path=log_dir / 'viewer.log')
    deadline = time.monotonic() + 60
    while 'live view: open' not in viewer.output():
        if not viewer.alive() or time.monotonic() > deadline:
            raise RuntimeError(f'the viewer did not start:\n{viewer.output()}')
        time.sleep(0.2)
    return viewer


def half(chain: Chain, label: str, seconds: float) -> dict[str, float]:
    r = chain.run(10.0, seconds)
    time.sleep(1.5)  # the agent's /diagnostics after the run (1 Hz)
    agent = chain.agent_diag
    print(f'{label:>14}: missed {r["missed"]}/{r["frames"]}, frame->action received p50 {r["p50"]:.2f} ms '
          f'p99 {r["p99"]:.2f} ms; agent-side p99 {agent.get("latency_p99_ms", "?")} ms, step p99 '
          f'{agent.get("step_p99_ms", "?")} ms', flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', default='cpu')
    parser.add_argument('--seconds', type=float, default=30.0, help='length of each 10 Hz half')
    parser.add_argument('--viewer', nargs='*', default=[], metavar='NAME=VALUE',
                        help="the viewer's parameters (YAML values), e.g. nice=10 prediction_interval=0")
    args = parser.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (item.split('=', 1) for item in args.viewer)}
    print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, Python {platform.python_version()}; preset {args.preset}; '
          f'viewer parameters {extra or "(defaults)"}')
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        # The agent's own percentiles over exactly one half's steps; predictions published, as a
        # graph has them, decoded only while someone (the viewer) subscribes.
        chain = Chain(args.preset, log_dir, agent_params={
            'latency_window': int(round(args.seconds * 10)), 'publish_prediction': True})
        viewer = None
        try:
            chain.wait_ready()
            time.sleep(1.0)
            before = half(chain, 'without viewer', args.seconds)
            viewer = start_viewer(log_dir, extra)
            time.sleep(2.0)  # its subscriptions matched, its first images logged
            during = half(chain, 'with viewer', args.seconds)
            exit_code = viewer.stop()
            viewer = None
            time.sleep(2.0)
            after = half(chain, 'without again', args.seconds)
            base = (before['p99'] + after['p99']) / 2
            print(f'viewer: p99 {during["p99"]:.2f} ms vs {base:.2f} ms without '
                  f'({100 * (during["p99"] / base - 1):+.1f}%), missed {during["missed"]} vs '
                  f'{before["missed"]} and {after["missed"]}; viewer exit code {exit_code}; '
                  f'.rrd {(log_dir / "bench.rrd").stat().st_size / 1e6:.1f} MB')
        finally:
            if viewer is not None:
                viewer.stop()
            chain.close()


if __name__ == '__main__':
    main()
