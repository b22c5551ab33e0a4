"""The SD3 / SD3.5 networks, one architecture per module."""
