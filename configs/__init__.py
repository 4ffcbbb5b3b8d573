"""What a run is made of, in data: schema.py (frozen dataclasses, Literal choices), registry.py (models.yaml,
presets.yaml, a model by id or folder), validate.py (a request checked, its defaults filled), local.py (a model
folder's facts from its files), paths.py ($FITVIDEO_HOME). Imports nothing of FitVideo's but families/."""
