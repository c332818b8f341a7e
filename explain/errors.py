"""Why an explanation was not given: each maps to one error code at the serving edge."""


class TooManyLabels(ValueError):
    """More labels qualify for an explanation than one image may have explained."""


class UnknownLabel(ValueError):
    """A supplied target box names a label the model does not have."""


class Stopped(Exception):
    """The caller stopped waiting: the explanation was abandoned between two units of work (a label, a batch of
    D-RISE masks)."""
