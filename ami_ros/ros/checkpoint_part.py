"""A node's part of the graph's checkpoints: write it on request, restore it at start.

The manager assembles one checkpoint directory from every node (layout and
atomicity: `ami_ros/core/checkpoint.py`). Each node that holds state serves

  <node name>/save_checkpoint   rcl_interfaces/srv/SetParameters with one
                                string Parameter 'directory': the staging
                                directory of the checkpoint being written,
                                which must be a stage directly under the node's
                                `checkpoint_dir` (core/checkpoint.confined_stage:
                                no '..', no symlink, this user's). The node
                                writes its files there (write_tensors /
                                write_json, owner-only) and answers successful,
                                or not with a one-line reason.

calls `after_save` once its part is written (the nodes publish their
diagnostics then, so the run record ends on the counters the checkpoint
holds), and declares the parameter `checkpoint` (a complete checkpoint directory, ''
= start fresh): the node restores its part before it first acts or trains,
and refuses to start, with one line naming the file, if it cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rcl_interfaces.msg import ParameterType, SetParametersResult
from rcl_interfaces.srv import SetParameters

from ami_ros.core.checkpoint import CheckpointError, confined_stage, load_manifest


class CheckpointPart:
    """Serves save_checkpoint for `node` and restores from its `checkpoint` parameter."""

    def __init__(self, node, save: Callable[[Path], None], restore: Callable[[Path], None],
                 preset: str | None = None, after_save: Callable[[], None] | None = None) -> None:
        self.node = node
        self._save = save
        self._after_save = after_save
        self.restored_from: Path | None = None
        # Read-only: a save request may name only a stage in the folder the launch gave.
        self.checkpoint_dir = Path(node.declare(
            'checkpoint_dir', 'checkpoints', "The manager's checkpoint_dir (relative: to the working "
            'directory): save_checkpoint writes only into stages directly under it. Read at start.',
            read_only=True)).absolute()
        arg = node.declare('checkpoint', '', 'Checkpoint directory to restore this node from at '
                           "start ('' = start fresh); the launchers resolve checkpoint:=latest.")
        if arg:
            path = Path(arg)
            load_manifest(path, expected_preset=preset)  # a damaged or foreign one: refuse now
            restore(path)
            self.restored_from = path
            node.get_logger().info(f'restored from checkpoint {path}')
        node.create_service(SetParameters, f'{node.get_name()}/save_checkpoint', self._on_save)

    def _on_save(self, request: SetParameters.Request,
                 response: SetParameters.Response) -> SetParameters.Response:
        directory = next((p.value.string_value for p in request.parameters
                          if p.name == 'directory' and p.value.type == ParameterType.PARAMETER_STRING),
                         '')
        try:
            if not directory:
                raise CheckpointError("save_checkpoint needs a string parameter 'directory'")
            self._save(confined_stage(directory, self.checkpoint_dir))
            result = SetParametersResult(successful=True)
        except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
            self.node.get_logger().error(f'could not save checkpoint part: {exc}')
            result = SetParametersResult(successful=False, reason=str(exc).replace('\n', ' '))
        response.results = [result]
        if result.successful and self._after_save is not None:
            try:
                self._after_save()
            except Exception as exc:  # noqa: BLE001 - the part is saved; only the report failed
                self.node.get_logger().warning(f'saved, but reporting after the save failed: {exc}')
        return response
