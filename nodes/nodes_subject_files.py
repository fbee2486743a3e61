"""SaveSubject / LoadSubject: subjects as small files, reusable across graphs."""
import logging
import os

import folder_paths
from comfy_api.latest import io

from ..blip_core import subject_io
from . import paths
from .types import SubjectEncoderType, SubjectType

log = logging.getLogger("blip_diffusion")


class SaveSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveSubject",
            display_name="Save Subject",
            category="blip_diffusion",
            description=("Saves a subject as a small .safetensors file in models/blip_subjects/ (category, the "
                         "encoder's fingerprint and how it was made are stored with it), so later graphs can skip "
                         "the encoder. Existing files are kept unless overwrite is on."),
            inputs=[
                SubjectType.Input("subject", tooltip="The subject to save."),
                *paths.save_name_inputs("my_subject"),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="The saved file's name.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, subject, name, overwrite) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths(paths.SUBJECT_FOLDER)[0]
        path = subject_io.save_subject(subject, folder, name, overwrite=overwrite)
        return io.NodeOutput(os.path.basename(path))


class LoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadSubject",
            display_name="Load Subject",
            category="blip_diffusion",
            description=("Loads a subject saved by Save Subject. Connect the subject encoder of this graph to be "
                         "warned when the file was made by a different encoder."),
            inputs=[
                io.Combo.Input("subject_name", options=folder_paths.get_filename_list(paths.SUBJECT_FOLDER),
                               tooltip="A file in models/blip_subjects/."),
                SubjectEncoderType.Input("subject_encoder", optional=True,
                                         tooltip="Optional: the encoder in use, to check the file against it."),
            ],
            outputs=[SubjectType.Output(tooltip="The saved subject.")],
        )

    @classmethod
    def fingerprint_inputs(cls, subject_name, **_):
        return paths.file_stamp(paths.SUBJECT_FOLDER, subject_name)

    @classmethod
    def execute(cls, subject_name, subject_encoder=None) -> io.NodeOutput:
        path = paths.saved_file_path(paths.SUBJECT_FOLDER, subject_name, "subject",
                                     ": save one with Save Subject first, or choose an existing file")
        try:
            subject = subject_io.load_subject(path)
        except ValueError as e:
            raise ValueError(f"{e}: choose another file, or encode the subject again and save it") from e
        made_by = subject.meta.get("encoder_fingerprint")
        if subject_encoder is not None and made_by and made_by != subject_encoder.fingerprint:
            log.warning("LoadSubject: %s was made by a different subject encoder (%s, fingerprint %s) than the one "
                        "connected (%s, %s); it may not match this model", subject_name,
                        subject.meta.get("encoder"), made_by, subject_encoder.name, subject_encoder.fingerprint)
        return io.NodeOutput(subject)


NODES = [SaveSubject, LoadSubject]
