"""The live view: the graph streamed to a Rerun recording, watched in a browser.

ROS-free where it can be: `scene` turns message data into what the view
shows (entity paths, one tree per agent namespace; the map, trail and pose in
map pixels; the agent-step clock; diagnostics sorted into plots and events),
`layout` is the viewer's layout in code (rerun.blueprint), `stream` owns the
recording, its sinks and the web viewer's server process. The node
ami_ros/nodes/viewer.py subscribes and feeds them.

rerun-sdk is an optional extra (`pip install 'ami_ros[view]'`); only `stream`
and `layout` import it, and `rerun_missing()` says in one line how to get it.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = ("pip install 'ami_ros[view]' (about 750 MB), or bash scripts/setup.sh, which installs it")


def rerun_missing() -> str | None:
    """One line saying how to get rerun-sdk when it cannot be imported; None when it can."""
    try:
        import rerun  # noqa: F401
    except ImportError as exc:
        return f'the live view needs rerun-sdk, which is not installed ({exc}): {INSTALL_HINT}'
    if importlib.util.find_spec('rerun_cli') is None:
        return f'the live view needs rerun-sdk\'s web viewer (rerun_cli), which is missing: {INSTALL_HINT}'
    return None
