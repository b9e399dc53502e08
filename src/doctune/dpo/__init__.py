"""Preference alignment (DPO) on the synthetic preference pairs."""
