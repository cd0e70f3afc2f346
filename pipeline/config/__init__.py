"""The one typed config (pydantic), in parts: sections.py and schema.py are the schema, loading.py reads it
from YAML with --set overrides, checks.py checks it against the file system and the network."""
