"""Inversion: SipIt's position-by-position search, its candidate policies and its verifier."""

from sipit.invert.policies import DEFAULT, POLICIES
from sipit.invert.sipit import InversionResult, TokenStat, invert

__all__ = ["invert", "InversionResult", "TokenStat", "POLICIES", "DEFAULT"]
