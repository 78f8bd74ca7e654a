"""The live view's layout, in code: what the browser shows without anyone arranging it.

Per agent: the camera and the prediction side by side with the top-down map
(trail and pose on it), then plots of reward, prediction error, each
trainer's loss and the frame->action latency, and the weight versions as
events. Several agents are tabs. The time panel follows the agent-step timeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import rerun.blueprint as rrb

from ami_ros.view.scene import AgentEntities

STEP_TIMELINE = 'step'
WALL_TIMELINE = 'wall_time'


def agent_view(entities: AgentEntities) -> rrb.Container:
    """One agent's views."""
    pictures = rrb.Horizontal(
        rrb.Spatial2DView(origin=entities.camera, name='camera'),
        rrb.Spatial2DView(origin=entities.prediction, name='prediction (next frame)'),
        rrb.Spatial2DView(origin=entities.map, name='map, trail and pose'),
    )
    plots = rrb.Grid(
        rrb.TimeSeriesView(origin=entities.reward, name='reward'),
        rrb.TimeSeriesView(origin=entities.prediction_error, name='prediction error'),
        rrb.TimeSeriesView(origin=entities.losses, name='trainer losses'),
        rrb.TimeSeriesView(origin=entities.latency, name='frame -> action latency (ms)'),
        rrb.TextLogView(origin=entities.events, name='weight versions'),
        grid_columns=3,
    )
    return rrb.Vertical(pictures, plots, row_shares=[3, 2], name=entities.root)


def blueprint(agents: Sequence[AgentEntities]) -> rrb.Blueprint:
    """The whole layout: one agent's views, or a tab per agent."""
    views = [agent_view(entities) for entities in agents]
    top = views[0] if len(views) == 1 else rrb.Tabs(*views)
    return rrb.Blueprint(
        top,
        rrb.TimePanel(timeline=STEP_TIMELINE, play_state='following'),
        collapse_panels=True,
    )
