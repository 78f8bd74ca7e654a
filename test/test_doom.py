"""ami_ros.worlds.doom without ROS: the held VRChat input and the real ViZDoom world."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ami_ros.worlds.doom import (
    RUN_FORWARD,
    WALK_FORWARD,
    WALK_SIDE,
    DoomWorld,
    VRChatInputState,
    frame_skip_for,
    resolve_scenario,
)


@pytest.fixture
def world():
    # A fresh seeded game per test (~0.15 s): same start spot, no order coupling.
    w = DoomWorld('my_way_home', frame_skip=4, seed=1, episode_timeout=600.0)
    yield w
    w.close()


def heading(angle_deg: float) -> np.ndarray:
    return np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])


def angle_change(before: float, after: float) -> float:
    """Signed change in degrees, in (-180, 180]: positive = counter-clockwise (left)."""
    return (after - before + 180.0) % 360.0 - 180.0


def drive(world: DoomWorld, inputs: VRChatInputState, steps: int):
    for _ in range(steps):
        state = world.step(inputs.to_buttons())
    return state


# -- the input state ---------------------------------------------------------
def test_axes_hold_until_reset_and_buttons_while_pressed():
    inputs = VRChatInputState()
    assert inputs.to_buttons() == [0.0, 0.0, 0.0, 0.0]
    assert inputs.handle('/input/Vertical', 1.0)
    assert inputs.handle('/input/Jump', 1)
    for _ in range(3):  # held: reading does not consume anything
        forward, side, turn, jump = inputs.to_buttons()
        assert forward == WALK_FORWARD and side == 0.0 and turn == 0.0 and jump == 1.0
    inputs.handle('/input/Run', 1)
    assert inputs.to_buttons()[0] == RUN_FORWARD
    inputs.handle('/input/Vertical', 0.0)
    inputs.handle('/input/Jump', 0)
    inputs.handle('/input/Run', 0)
    assert inputs.to_buttons() == [0.0, 0.0, 0.0, 0.0]


def test_mapping_signs_proportion_and_buttons():
    inputs = VRChatInputState(turn_speed=35.0)  # 1 degree per tic at full deflection
    inputs.handle('/input/Vertical', -0.5)
    inputs.handle('/input/Horizontal', 1.0)
    inputs.handle('/input/LookHorizontal', -1.0)
    assert inputs.to_buttons() == [-0.5 * WALK_FORWARD, WALK_SIDE, -1.0, 0.0]
    inputs.release_all()
    inputs.handle('/input/MoveForward', 1)
    inputs.handle('/input/MoveLeft', 1)
    inputs.handle('/input/LookRight', 1)
    assert inputs.to_buttons() == [WALK_FORWARD, -WALK_SIDE, 1.0, 0.0]
    inputs.handle('/input/Vertical', 1.0)  # axis + button saturate at full deflection
    assert inputs.to_buttons()[0] == WALK_FORWARD


def test_wrong_values_are_refused_and_unknown_addresses_ignored():
    inputs = VRChatInputState()
    for address, values in [('/input/Vertical', (1,)), ('/input/Vertical', (1.5,)),
                            ('/input/Vertical', (math.nan,)), ('/input/Jump', (True,)),
                            ('/input/Jump', (1.0,)), ('/input/Jump', (2,)), ('/input/Run', ())]:
        with pytest.raises(ValueError):
            inputs.handle(address, *values)
    assert not inputs.handle('/input/Fly', 1.0)
    assert not inputs.handle('/avatar/parameters/Foo', 1)
    assert inputs.to_buttons() == [0.0, 0.0, 0.0, 0.0]


def test_scenario_and_frame_skip_helpers():
    assert resolve_scenario('my_way_home').endswith('my_way_home.cfg')
    with pytest.raises(ValueError, match='one of'):
        resolve_scenario('no_such_scenario')
    assert frame_skip_for(10.0) == 4 and frame_skip_for(35.0) == 1 and frame_skip_for(1.0) == 35


# -- the world ---------------------------------------------------------------
def test_frame_is_84x84_rgb(world):
    frame = world.step([0.0, 0.0, 0.0, 0.0]).frame
    assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
    assert frame.std() > 1.0  # a rendered view, not a blank buffer


def test_forward_moves_along_heading(world):
    start = world.observe()
    inputs = VRChatInputState()
    inputs.handle('/input/Vertical', 1.0)
    end = drive(world, inputs, 6)
    moved = np.array([end.x - start.x, end.y - start.y])
    along = float(moved @ heading(start.angle))
    assert along > 50.0, f'moved {moved} with heading {start.angle:.1f} deg'
    assert abs(angle_change(start.angle, end.angle)) < 1e-6


def test_strafe_right_moves_to_the_right():
    # my_way_home starts in a narrow corridor; basic's room leaves space to the side.
    world = DoomWorld('basic', frame_skip=4, seed=1, episode_timeout=600.0)
    try:
        start = world.observe()
        inputs = VRChatInputState()
        inputs.handle('/input/Horizontal', 1.0)
        end = drive(world, inputs, 4)
    finally:
        world.close()
    moved = np.array([end.x - start.x, end.y - start.y])
    right = heading(start.angle - 90.0)  # angles grow counter-clockwise
    assert float(moved @ right) > 40.0, f'moved {moved} with heading {start.angle:.1f} deg'
    assert abs(float(moved @ heading(start.angle))) < 1.0


def test_turning_right_lowers_the_angle(world):
    # Doom angles grow counter-clockwise, so a right turn makes the angle smaller.
    inputs = VRChatInputState()
    start = world.observe().angle
    inputs.handle('/input/LookHorizontal', 1.0)
    after_right = drive(world, inputs, 3).angle
    expected = 3 * 4 * inputs.turn_per_tic
    assert angle_change(start, after_right) == pytest.approx(-expected, abs=0.5)
    inputs.handle('/input/LookHorizontal', -0.5)  # half deflection: half the rate, to the left
    after_left = drive(world, inputs, 3).angle
    assert angle_change(after_right, after_left) == pytest.approx(expected / 2, abs=0.5)


def test_release_stops_after_momentum_decays(world):
    inputs = VRChatInputState()
    inputs.handle('/input/Vertical', 1.0)
    inputs.handle('/input/LookHorizontal', 1.0)
    drive(world, inputs, 5)
    inputs.handle('/input/Vertical', 0.0)
    inputs.handle('/input/LookHorizontal', 0.0)
    previous = world.observe()
    for _ in range(30):  # Doom's friction needs ~12 steps of 4 tics to stop a walk
        state = world.step(inputs.to_buttons())
        if (state.x, state.y) == (previous.x, previous.y):
            break
        assert state.angle == previous.angle  # turning stops at once
        previous = state
    else:
        pytest.fail('the player still slides 30 steps after release')
    for _ in range(3):
        state = world.step(inputs.to_buttons())
        assert (state.x, state.y, state.angle) == (previous.x, previous.y, previous.angle)


def test_episode_restarts_on_its_own():
    world = DoomWorld('my_way_home', frame_skip=4, seed=1, episode_timeout=0.5)
    try:
        first = world.observe()
        assert first.episode == 1
        states = [world.step([0.0, 0.0, 0.0, 0.0]) for _ in range(20)]
        first_new = next((i for i, s in enumerate(states) if s.episode == 2), None)
        assert first_new, 'no new episode after 80 tics with an 18-tic timeout'
        assert states[first_new].tic < states[first_new - 1].tic  # the tic count starts again
        assert states[first_new].frame.shape == (84, 84, 3)
    finally:
        world.close()


def test_a_fixed_start_holds_for_every_episode():
    # Without `start`, my_way_home spawns the player in a random room.
    world = DoomWorld('my_way_home', frame_skip=4, seed=1, episode_timeout=0.5, start=(240.0, -176.0))
    try:
        state = world.observe()
        starts, moved = [(state.episode, state.x, state.y)], False
        while len(starts) < 3:
            state = world.step([WALK_FORWARD, 0.0, 0.0, 0.0])
            if state.episode != starts[-1][0]:
                starts.append((state.episode, state.x, state.y))
            else:
                moved = moved or math.dist((state.x, state.y), (240.0, -176.0)) > 10.0
        assert [e for e, _, _ in starts] == [1, 2, 3]
        for _, x, y in starts:
            assert math.dist((x, y), (240.0, -176.0)) < 1.0
        assert moved, 'the player never left the start, so a restart there proves nothing'
    finally:
        world.close()


def test_closing_leaves_the_working_directory_as_it_was(tmp_path, monkeypatch):
    # ViZDoom makes an empty _vizdoom/ in the working directory at init.
    monkeypatch.chdir(tmp_path)
    world = DoomWorld('my_way_home', frame_skip=4, seed=1)
    assert (tmp_path / '_vizdoom').is_dir()
    world.close()
    assert list(tmp_path.iterdir()) == []
    # One that was there before is the user's, and stays.
    (tmp_path / '_vizdoom').mkdir()
    world = DoomWorld('my_way_home', frame_skip=4, seed=1)
    world.close()
    assert (tmp_path / '_vizdoom').is_dir()


def test_a_start_outside_the_map_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r'start 5000,5000 is outside every sector .* choose a point'):
        DoomWorld('my_way_home', start=(5000.0, 5000.0))
