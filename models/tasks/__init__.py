"""Tasks: the registry (`registry`), their settings (`settings`, declared with `fields`), architectures,
per-task ops (`ops` over `classification` and `detection`), metrics, tiling and polygons.

The task names themselves come from the label formats (`models.data.records.TASK_NAMES`), light
enough for the CLI's choices and the data tools; `registry.TASKS` holds one `Task` for each.
"""
