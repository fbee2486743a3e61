"""Socket types the pack adds to the host's graph."""
from comfy_api.latest import io

SubjectEncoderType = io.Custom("SUBJECT_ENCODER")
SubjectType = io.Custom("SUBJECT")
