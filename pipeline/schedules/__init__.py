"""Schedules as data: actions, placement (stage -> rank), the builders, the registry, lowering, the validator and simulator.

Pure Python over lists of actions: nothing here imports torch or touches a process group. It may
import the standard library only; every layer above reads schedules from here.
"""
