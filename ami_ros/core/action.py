"""The five-part discrete action and the VRChat controls it stands for.

Heads and choices (ACTION_CHOICES = 3,3,3,2,2):
  0 Vertical        {0: none, 1: forward (+1), 2: back (-1)}
  1 Horizontal      {0: none, 1: right (+1),   2: left (-1)}
  2 LookHorizontal  {0: none, 1: right (+1),   2: left (-1)}
  3 Jump            {0, 1}
  4 Run             {0, 1}
As sensor_msgs/Joy: axes = [Vertical, Horizontal, LookHorizontal] in
{-1, 0, 1}, buttons = [Jump, Run] in {0, 1}; the OSC bridge scales axes by
its per-axis velocity.
"""

from __future__ import annotations

from collections.abc import Sequence

from ami_ros.core.presets import ACTION_CHOICES

AXIS_NAMES = ('Vertical', 'Horizontal', 'LookHorizontal')
BUTTON_NAMES = ('Jump', 'Run')
_AXIS_VALUE = (0.0, 1.0, -1.0)
# VRChat's OSC input addresses, and what "release every input" sends to them: floats for
# axes, ints for buttons. The bridge sends it, and `ami-ros launch` when the bridge is gone.
OSC_AXES = tuple(f'/input/{name}' for name in AXIS_NAMES)
OSC_BUTTONS = tuple(f'/input/{name}' for name in BUTTON_NAMES)
RELEASED_INPUTS: dict[str, float | int] = {**{a: 0.0 for a in OSC_AXES}, **{b: 0 for b in OSC_BUTTONS}}


def action_to_controls(action: Sequence[int]) -> tuple[list[float], list[int]]:
    """A discrete action -> (axes, buttons) as the `action` topic carries them."""
    if len(action) != len(ACTION_CHOICES):
        raise ValueError(f'an action has {len(ACTION_CHOICES)} parts, got {len(action)}')
    for i, (a, n) in enumerate(zip(action, ACTION_CHOICES, strict=True)):
        if not 0 <= int(a) < n:
            raise ValueError(f'action part {i} = {a} is outside 0..{n - 1}')
    axes = [_AXIS_VALUE[int(a)] for a in action[:3]]
    buttons = [int(b) for b in action[3:]]
    return axes, buttons


def controls_to_action(axes: Sequence[float], buttons: Sequence[int]) -> list[int]:
    """The inverse, for recorded or human (gamepad) actions: axes by sign."""
    parts = [0 if abs(v) < 0.5 else (1 if v > 0 else 2) for v in axes[:3]]
    return parts + [1 if b else 0 for b in buttons[:2]]
