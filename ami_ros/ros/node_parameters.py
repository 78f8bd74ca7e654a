"""Other nodes' parameters, asked for over their parameter services.

The services `ros2 param dump` uses (`<node>/list_parameters`,
`<node>/get_parameters`) give the values a node runs with: defaults, the
parameters file and launch overrides alike. Each node is asked once, without
waiting for the answer; one that does not answer is asked again later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rcl_interfaces.srv import GetParameters, ListParameters
from rclpy.client import Client
from rclpy.parameter import parameter_value_to_python
from rclpy.task import Future

from ami_ros.ros.managed_node import ManagedNode

RETRY_AFTER = 30.0  # s before asking again a node that did not answer


class NodeParameterReader:
    """Asks nodes for their parameters; `on_answer(node, parameters)` gets each answer.

    `parameters` keeps every answer: node name -> {parameter: value}.
    """

    def __init__(self, node: ManagedNode, on_answer: Callable[[str, dict[str, Any]], None],
                 retry_after: float = RETRY_AFTER) -> None:
        self.node = node
        self.on_answer = on_answer
        self.retry_after = retry_after
        self.parameters: dict[str, dict[str, Any]] = {}
        self._asked: dict[str, float] = {}  # node -> when its parameters were asked for
        self._clients: dict[str, tuple[Client, Client]] = {}  # node -> (list, get) clients

    def ask(self, name: str) -> None:
        """Ask node `name` (relative to this node's namespace) once, without waiting."""
        if name in self.parameters or (
                time.monotonic() - self._asked.get(name, -math.inf) < self.retry_after):
            return
        clients = self._clients.get(name)
        if clients is None:
            clients = (self.node.create_client(ListParameters, f'{name}/list_parameters'),
                       self.node.create_client(GetParameters, f'{name}/get_parameters'))
            self._clients[name] = clients
        lister, getter = clients
        if not (lister.service_is_ready() and getter.service_is_ready()):
            return  # not yet discovered (or not a node with parameters): at the next ask
        self._asked[name] = time.monotonic()
        lister.call_async(ListParameters.Request()).add_done_callback(
            lambda future: self._on_names(name, getter, future))

    def _on_names(self, name: str, getter: Client, future: Future) -> None:
        try:
            names = list(future.result().result.names)
        except Exception as exc:  # the node went away meanwhile: asked again later
            self.node.warn_throttled('parameters', f'could not list the parameters of {name}: {exc}')
            return
        getter.call_async(GetParameters.Request(names=names)).add_done_callback(
            lambda future: self._on_values(name, names, future))

    def _on_values(self, name: str, names: list[str], future: Future) -> None:
        try:
            values = future.result().values
            parameters = {parameter: parameter_value_to_python(value)
                          for parameter, value in zip(names, values, strict=True)}
        except Exception as exc:
            self.node.warn_throttled('parameters', f'could not read the parameters of {name}: {exc}')
            return
        self.parameters[name] = parameters
        self.on_answer(name, parameters)
