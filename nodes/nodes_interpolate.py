"""SubjectInterpolate / SubjectInterpolate4: blends of subjects, as in the paper's interpolation figure."""
import logging

from comfy_api.latest import io

from ..blip_core import interpolate
from .types import SubjectType

log = logging.getLogger("blip_diffusion")

MODE_TIP = ("linear: a straight weighted average of the vectors. spherical: each of the 16 vectors turns along "
            "the arc between its two endpoints while its length changes linearly (vectors of equal length keep "
            "it); nearly parallel or opposite vectors are blended linearly (opposite ones meet at zero half way).")
CUSTOM_TIP = "The category word used when category is 'custom', e.g. 'robot dog'."


def factor_input(name, tip):
    return io.Float.Input(name, default=0.5, min=0.0, max=1.0, step=0.01,
                          tooltip=tip + " Values outside [0, 1] are refused, not clamped.")


def warn_mixed_encoders(node, subjects):
    prints = {k: s.meta.get("encoder_fingerprint") for k, s in subjects.items()}
    if len({p for p in prints.values() if p}) > 1:
        log.warning("%s: the subjects were made by different subject encoders (%s); their blend may not be "
                    "meaningful", node, prints)


class SubjectInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectInterpolate",
            display_name="Subject Interpolate",
            category="blip_diffusion",
            description=("Blends two subjects: t = 0 gives subject_a exactly, t = 1 subject_b exactly, values "
                         "between mix them (linearly, or spherically per query vector). Render the result with "
                         "SubjectConditioning to get a subject between the two. Both must come from the same "
                         "subject encoder."),
            inputs=[
                SubjectType.Input("subject_a", tooltip="The subject at t = 0."),
                SubjectType.Input("subject_b", tooltip="The subject at t = 1."),
                factor_input("t", "How far from subject_a (0) towards subject_b (1)."),
                io.Combo.Input("mode", options=list(interpolate.INTERPOLATIONS), default="linear", tooltip=MODE_TIP),
                io.Combo.Input("category", options=["a", "b", "custom"], default="a",
                               tooltip="The result's category: subject_a's, subject_b's, or custom_category."),
                io.String.Input("custom_category", default="", optional=True, tooltip=CUSTOM_TIP),
            ],
            outputs=[SubjectType.Output(tooltip="The blended subject (its meta records the sources, mode and t), "
                                                "for SubjectConditioning or SaveSubject.")],
        )

    @classmethod
    def execute(cls, subject_a, subject_b, t, mode, category, custom_category="") -> io.NodeOutput:
        subjects = {"a": subject_a, "b": subject_b}
        warn_mixed_encoders("SubjectInterpolate", subjects)
        return io.NodeOutput(interpolate.interpolate_subjects(subjects, {"t": t}, mode, category, custom_category))


class SubjectInterpolate4(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectInterpolate4",
            display_name="Subject Interpolate (4 corners)",
            category="blip_diffusion",
            description=("Blends four subjects on a square, as the paper's interpolation grid: subject_a sits at "
                         "(u=0, v=0), subject_b at (1, 0), subject_c at (0, 1), subject_d at (1, 1). u blends "
                         "a->b and c->d, then v blends between those two. Each corner is returned exactly; "
                         "(0.5, 0.5) in linear mode is the mean of the four."),
            inputs=[
                SubjectType.Input("subject_a", tooltip="The corner at u = 0, v = 0."),
                SubjectType.Input("subject_b", tooltip="The corner at u = 1, v = 0."),
                SubjectType.Input("subject_c", tooltip="The corner at u = 0, v = 1."),
                SubjectType.Input("subject_d", tooltip="The corner at u = 1, v = 1."),
                factor_input("u", "Horizontal position: 0 on the a/c side, 1 on the b/d side."),
                factor_input("v", "Vertical position: 0 on the a/b side, 1 on the c/d side."),
                io.Combo.Input("mode", options=list(interpolate.INTERPOLATIONS), default="linear", tooltip=MODE_TIP),
                io.Combo.Input("category", options=["a", "b", "c", "d", "custom"], default="a",
                               tooltip="The result's category: one corner's, or custom_category."),
                io.String.Input("custom_category", default="", optional=True, tooltip=CUSTOM_TIP),
            ],
            outputs=[SubjectType.Output(tooltip="The blended subject (its meta records the sources, mode, u and "
                                                "v), for SubjectConditioning or SaveSubject.")],
        )

    @classmethod
    def execute(cls, subject_a, subject_b, subject_c, subject_d, u, v, mode, category,
                custom_category="") -> io.NodeOutput:
        subjects = {"a": subject_a, "b": subject_b, "c": subject_c, "d": subject_d}
        warn_mixed_encoders("SubjectInterpolate4", subjects)
        return io.NodeOutput(interpolate.interpolate_subjects(subjects, {"u": u, "v": v}, mode, category,
                                                              custom_category))


NODES = [SubjectInterpolate, SubjectInterpolate4]
