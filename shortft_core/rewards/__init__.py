"""Differentiable rewards: ``reward(images in [0, 1] (B, 3, H, W), prompts) -> (B,)``, higher is better.

Build them by name with :func:`build_reward` / :func:`build_reward_spec` (see ``registry``); every reward loads
local files only, in the format its authors published.
"""

from .base import Reward
from .combine import WeightedReward
from .registry import (PRESETS, REWARDS, build_reward, build_reward_spec, check_reward_spec, format_reward_spec,
                       list_rewards, parse_reward_spec, reward_descriptions)
from .weights import RewardKeyMismatch, RewardWeightsNotFound

__all__ = ["PRESETS", "REWARDS", "Reward", "RewardKeyMismatch", "RewardWeightsNotFound", "WeightedReward",
           "build_reward", "build_reward_spec", "check_reward_spec", "format_reward_spec", "list_rewards",
           "parse_reward_spec", "reward_descriptions"]
