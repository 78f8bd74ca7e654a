"""The embedded world without ROS: VRChat's OSC input held as state, driving ViZDoom.

`VRChatInputState` holds what VRChat's OSC input API would hold (axes until
set back to 0.0, buttons while pressed) and turns it into a ViZDoom action.
`DoomWorld` runs a headless ViZDoom game, steps it with that action, restarts
episodes on its own and hands back the frame (resized like the camera's) and
the player's pose.

Control mapping (chosen so the axes stay proportional, as in VRChat):
the game's available buttons are ViZDoom *delta* buttons, whose value is
applied on every tic:

    MOVE_FORWARD_BACKWARD_DELTA = clip(Vertical + MoveForward - MoveBackward) * 25 (50 with Run)
    MOVE_LEFT_RIGHT_DELTA       = clip(Horizontal + MoveRight - MoveLeft)     * 24 (40 with Run)
    TURN_LEFT_RIGHT_DELTA       = clip(LookHorizontal + LookRight - LookLeft) * turn_speed / 35 deg
    JUMP                        = Jump

25/24 and 50/40 are Doom's own walk/run speeds (what MOVE_FORWARD/MOVE_RIGHT
and SPEED give), so full deflection walks exactly like the keyboard and half
deflection walks at half speed. Positive deltas are forward, right and turn
right. Run doubles movement only, not turning, as in VRChat (Doom's SPEED
button does not act on delta buttons, so it is left out). Doom angles grow
counter-clockwise (0 = +x, 90 = +y), so turning right lowers ANGLE.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import vizdoom as vzd

from ami_ros.core.observation import center_crop_resize
from ami_ros.worlds.world_map import Segment, inside_mask

TICRATE = 35  # Doom tics per second of game time
AXES = ('Vertical', 'Horizontal', 'LookHorizontal')
BUTTONS = ('MoveForward', 'MoveBackward', 'MoveLeft', 'MoveRight',
           'LookLeft', 'LookRight', 'Jump', 'Run')
PREFIX = '/input/'

# Doom's forwardmove/sidemove values for walking and running (d_main / g_game).
WALK_FORWARD, RUN_FORWARD = 25.0, 50.0
WALK_SIDE, RUN_SIDE = 24.0, 40.0
# Doom's keyboard turn: 640 angle units (of 65536) per tic = 3.515625 deg/tic.
DEFAULT_TURN_SPEED = 640 / 65536 * 360 * TICRATE  # ~123 deg per second of game time

DOOM_BUTTONS = (vzd.Button.MOVE_FORWARD_BACKWARD_DELTA, vzd.Button.MOVE_LEFT_RIGHT_DELTA,
                vzd.Button.TURN_LEFT_RIGHT_DELTA, vzd.Button.JUMP)
GAME_VARIABLES = (vzd.GameVariable.POSITION_X, vzd.GameVariable.POSITION_Y,
                  vzd.GameVariable.POSITION_Z, vzd.GameVariable.ANGLE)
RENDER_SIZE = (160, 120)
# my_way_home's spawn spot farthest from its goal (the green armour at
# 1040,-352): the exploration benches start every episode here.
MY_WAY_HOME_FAR_ROOM = (240.0, -176.0)


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


class VRChatInputState:
    """The input VRChat would hold from `/input/...` OSC messages; thread-safe.

    Axes take a finite float in [-1, 1] and stay until set back to 0.0;
    buttons take int 1 (pressed) or 0 (released) and act while pressed.
    """

    def __init__(self, turn_speed: float = DEFAULT_TURN_SPEED) -> None:
        self.turn_per_tic = turn_speed / TICRATE
        self._lock = threading.Lock()
        self._axes = dict.fromkeys(AXES, 0.0)
        self._buttons = dict.fromkeys(BUTTONS, 0)

    def handle(self, address: str, *values: object) -> bool:
        """Apply one OSC message.

        Returns False for an address VRChat's input API does not have (the
        caller may log it); raises ValueError for a known address with a
        value of the wrong type or range, which is then ignored.
        """
        if not address.startswith(PREFIX):
            return False
        name = address[len(PREFIX):]
        if name not in self._axes and name not in self._buttons:
            return False
        if len(values) != 1:
            raise ValueError(f'{address} takes one value, got {len(values)}')
        value = values[0]
        if name in self._axes:
            # VRChat wants an OSC float; python-osc decodes those as float, ints as int.
            if type(value) is not float or not math.isfinite(value) or not -1.0 <= value <= 1.0:
                raise ValueError(f'{address} takes a float in [-1, 1], got {value!r}')
            with self._lock:
                self._axes[name] = value
        else:
            # bool is an int subclass, but OSC True/False is not what VRChat reads.
            if type(value) is not int or value not in (0, 1):
                raise ValueError(f'{address} takes int 1 (pressed) or 0 (released), got {value!r}')
            with self._lock:
                self._buttons[name] = value
        return True

    def release_all(self) -> None:
        """Every axis 0.0, every button released."""
        with self._lock:
            self._axes = dict.fromkeys(AXES, 0.0)
            self._buttons = dict.fromkeys(BUTTONS, 0)

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        """Copies of the held axes and buttons."""
        with self._lock:
            return dict(self._axes), dict(self._buttons)

    def to_buttons(self) -> list[float]:
        """The ViZDoom action for DOOM_BUTTONS (see the module docstring)."""
        axes, pressed = self.snapshot()
        run = bool(pressed['Run'])
        forward = _clip(axes['Vertical'] + pressed['MoveForward'] - pressed['MoveBackward'])
        side = _clip(axes['Horizontal'] + pressed['MoveRight'] - pressed['MoveLeft'])
        turn = _clip(axes['LookHorizontal'] + pressed['LookRight'] - pressed['LookLeft'])
        return [forward * (RUN_FORWARD if run else WALK_FORWARD),
                side * (RUN_SIDE if run else WALK_SIDE),
                turn * self.turn_per_tic,
                float(pressed['Jump'])]


def resolve_scenario(scenario: str) -> str:
    """A scenario name ('my_way_home') or a .cfg path -> an existing .cfg path."""
    if scenario.endswith('.cfg') or os.sep in scenario:
        path = os.path.abspath(os.path.expanduser(scenario))
    else:
        path = os.path.join(vzd.scenarios_path, scenario + '.cfg')
    if not os.path.isfile(path):
        names = sorted(f[:-4] for f in os.listdir(vzd.scenarios_path) if f.endswith('.cfg'))
        raise ValueError(f'no ViZDoom scenario {scenario!r} ({path} does not exist); '
                         f'use a .cfg path or one of: {", ".join(names)}')
    return path


def frame_skip_for(fps: float) -> int:
    """Doom tics per step so one step lasts about 1/fps s of game time."""
    return max(1, round(TICRATE / fps))


@dataclass(eq=False)  # holds an array: compare fields, not states
class WorldState:
    """What one step leaves: the resized RGB frame and the player's pose."""

    frame: np.ndarray  # HxWx3 uint8
    x: float  # map units
    y: float
    z: float
    angle: float  # degrees, counter-clockwise from +x
    episode: int  # episodes started so far (1 = the first)
    tic: int  # tic within the episode


class DoomWorld:
    """A headless ViZDoom game stepped with DOOM_BUTTONS actions.

    Not thread-safe: step it from one thread. Episodes restart on their own
    when they end (timeout, goal reached or the player died). `start` (map
    x, y) puts the player there at the start of every episode instead of
    the scenario's own spawn spot (my_way_home picks a random room), the
    fixed start of the "sparse" MyWayHome settings of Pathak et al. 2017.
    `sectors` holds the level's geometry (each sector's lines, read once:
    episodes restart the same level), for maps of it.
    """

    def __init__(self, scenario: str = 'my_way_home', *, frame_skip: int = 4,
                 width: int = 84, height: int = 84, episode_timeout: float = 0.0,
                 seed: int | None = None, start: tuple[float, float] | None = None) -> None:
        self.config_path = resolve_scenario(scenario)
        self.start = None if start is None else (float(start[0]), float(start[1]))
        self.frame_skip = int(frame_skip)
        self.size = (int(height), int(width))
        self.episode = 0
        self.sectors: list[list[Segment]] = []
        # ViZDoom writes its _vizdoom.ini into the working directory unless told otherwise.
        self._ini_dir = tempfile.mkdtemp(prefix='ami_ros_vizdoom_')
        # It also makes an empty _vizdoom/ there at init, which nothing here
        # uses: removed at close unless it was there before.
        runtime_dir = os.path.abspath('_vizdoom')
        self._runtime_dir = None if os.path.exists(runtime_dir) else runtime_dir
        game = vzd.DoomGame()
        self.game = game
        try:
            game.load_config(self.config_path)
            game.set_doom_config_path(os.path.join(self._ini_dir, '_vizdoom.ini'))
            game.set_window_visible(False)
            game.set_sound_enabled(False)
            game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
            game.set_screen_format(vzd.ScreenFormat.RGB24)
            game.set_depth_buffer_enabled(False)
            game.set_labels_buffer_enabled(False)
            game.set_automap_buffer_enabled(False)
            game.set_render_all_frames(False)  # frames skipped by frame_skip are not drawn
            game.set_mode(vzd.Mode.PLAYER)
            game.set_available_buttons(list(DOOM_BUTTONS))
            game.set_available_game_variables(list(GAME_VARIABLES))
            if episode_timeout > 0:
                game.set_episode_timeout(max(1, round(episode_timeout * TICRATE)))
            if seed is not None and seed >= 0:
                game.set_seed(int(seed))
            if self.start is not None:
                game.add_game_args('+sv_cheats 1')  # the console's warp is a cheat
            # The level's lines: for its map and to check that the start is in it. Only
            # settable before init; copying them costs ~0.1 ms a step on my_way_home.
            game.set_sectors_info_enabled(True)
            # The engine is a child process: a terminal's Ctrl-C to the process group (ros2
            # launch) would end it under the node while the graph saves its final checkpoint.
            # It inherits SIGINT blocked, and stops when closed.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                game.init()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._new_episode()
        except Exception:
            self.close()
            raise

    def _new_episode(self) -> None:
        self.game.new_episode()
        self.episode += 1
        if self.episode == 1:
            self.sectors = [[Segment(line.x1, line.y1, line.x2, line.y2, bool(line.is_blocking))
                             for line in sector.lines] for sector in self.game.get_state().sectors]
        if self.start is not None:
            x, y = self.start
            point = (np.array(x), np.array(y))
            if self.episode == 1 and not any(inside_mask(lines, *point) for lines in self.sectors):
                xs = [v for lines in self.sectors for line in lines for v in (line.x1, line.x2)]
                ys = [v for lines in self.sectors for line in lines for v in (line.y1, line.y2)]
                raise ValueError(f'start {x:g},{y:g} is outside every sector of {self.config_path} '
                                 f'(map x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}); '
                                 'choose a point inside the map')
            self.game.send_game_command(f'warp {x} {y}')
            self.game.advance_action(1)  # console commands act on the next tic

    def step(self, action: Sequence[float]) -> WorldState:
        """Hold `action` for frame_skip tics; restart the episode if it ended."""
        self.game.make_action(list(action), self.frame_skip)
        if self.game.is_episode_finished() or self.game.is_player_dead():
            self._new_episode()
        return self.observe()

    def observe(self) -> WorldState:
        """The current frame and pose, without advancing the game."""
        state = self.game.get_state()
        x, y, z, angle = (float(v) for v in state.game_variables)
        frame = center_crop_resize(state.screen_buffer, *self.size)
        return WorldState(frame, x, y, z, angle, self.episode, int(state.tic))

    def close(self) -> None:
        """Stop the engine; safe to call twice."""
        if self.game is not None:
            self.game.close()
            self.game = None
        shutil.rmtree(self._ini_dir, ignore_errors=True)
        if self._runtime_dir is not None:
            try:
                os.rmdir(self._runtime_dir)  # only while empty: another game may be using it
            except OSError:
                pass
            self._runtime_dir = None
