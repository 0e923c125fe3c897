"""The agent: reconciles each container's desired state into kernel + relay."""

from egressd.agent.plan import Plan, Step, plan
from egressd.agent.runner import Agent

__all__ = ["Agent", "Plan", "Step", "plan"]
