"""The cpu preset's small sizes with the policy on the frame through its own
conv trunk, as ami's and large's policies act: fast tests of that policy."""

from dataclasses import replace

from ami_ros.core.presets import get_preset

ON_FRAME = replace(get_preset('cpu'), name='cpu-on-frame',
                   policy=replace(get_preset('cpu').policy, input='image'))
