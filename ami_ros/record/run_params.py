"""What a run records as params, without ROS.

`parse_params`: the launch arguments ('k=v;k=v'); `node_params`: each node's
parameters as `<node>/<name>`, like its metrics; `parameters_file`: all of
them as a ROS 2 parameters file, to pass back as `params_file:=`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def parse_params(value: str | Sequence[str] | None) -> dict[str, str]:
    """Run params from 'k=v;k=v' or ['k=v', ...]; entries without '=' are refused."""
    if value is None:
        return {}
    items = value.split(';') if isinstance(value, str) else list(value)
    params: dict[str, str] = {}
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        key, sep, val = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f'run param {item!r} is not key=value (use "preset=cpu;world=doom")')
        params[key.strip()] = val.strip()
    return params


def param_text(value: Any) -> str:
    """A parameter value as a run param: strings as they are, the rest as
    JSON (true, 0.8, [1.0, 1.0]), the way a parameters file would spell them."""
    return value if isinstance(value, str) else json.dumps(value)


def node_params(node: str, parameters: Mapping[str, Any]) -> dict[str, str]:
    """One node's parameters as run params `<node>/<name>`, like its metrics."""
    return {f'{node}/{name}': param_text(value) for name, value in parameters.items()}


def parameters_file(nodes: Mapping[str, Mapping[str, Any]]) -> str:
    """A ROS 2 parameters file (YAML) holding each node's parameters, keyed by
    its fully qualified name (`ros2 param dump`'s layout): what the run ran
    with, to pass back as `params_file:=`."""
    import yaml

    return yaml.safe_dump({name: {'ros__parameters': dict(sorted(params.items()))}
                           for name, params in sorted(nodes.items())}, sort_keys=False)
