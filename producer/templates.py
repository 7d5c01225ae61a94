"""Built-in template sets: named lists of prompt templates that a job can select instead of listing its own.

A job that names a set is submitted with the set's templates written out in `JobSpec.templates`, so workers
read the same spec field either way. `_SUCCESS.json` records the set's name. Each template contains `{}`
once, where the label goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.constants import DEFAULT_TEMPLATES
from producer.errors import InvalidJobSpec

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    # The templates a job gets when it names neither a set nor its own templates.
    "default": tuple(DEFAULT_TEMPLATES),
    # Photo-style wordings for this project: each varies one property of a photograph (lighting, framing,
    # distance, focus, crop, colour, source), so the label embedding averages over them.
    "photo": (
        "a photo of a {}.",
        "a snapshot showing a {}.",
        "a {} photographed up close.",
        "a wide shot with a {} in the frame.",
        "a {} photographed from far away.",
        "a photo of a {} in bright daylight.",
        "a dim, poorly lit photo of a {}.",
        "a photo of a {} taken at night with a flash.",
        "an out-of-focus shot of a {}.",
        "a sharp, well focused photo of a {}.",
        "a photo where the {} is partly cut off by the edge.",
        "a photo of a {} in the centre of the frame.",
        "a monochrome photograph of a {}.",
        "an overexposed photo of a {}.",
        "a grainy, noisy picture of a {}.",
        "a phone camera picture of a {}.",
        "a photo of a {} seen from above.",
        "a photo of a {} against a plain background.",
        "a photo of a {} in a cluttered scene.",
        "a tiny {} far off in the corner of a photo.",
        "a {} filling the whole frame.",
    ),
}


def template_set(name: str) -> list[str]:
    """Return the templates of the built-in set `name` as a new list.

    Raises InvalidJobSpec naming `name` and listing the known sets when no set has that name.
    """
    templates = TEMPLATE_SETS.get(name) if isinstance(name, str) else None
    if templates is None:
        known = ", ".join(sorted(TEMPLATE_SETS))
        raise InvalidJobSpec(f"invalid job spec: template_set: unknown template set {name!r}; known sets: {known}")
    return list(templates)


def expand_template_set(data: Any) -> Any:
    """Return JobSpec input `data` with `templates` filled from its `template_set` when no templates are given.

    Input with both, such as a spec read back from Redis, is returned unchanged, so a stored spec stays
    readable after a set's wording changes. Raises InvalidJobSpec for an unknown set name.
    """
    if not isinstance(data, dict) or data.get("template_set") is None or data.get("templates") is not None:
        return data
    return {**data, "templates": template_set(data["template_set"])}


def check_template_choice(fields: Mapping[str, Any]) -> None:
    """Raise InvalidJobSpec when the `template_set` of new job fields is unknown or conflicts with other fields.

    A set conflicts with `templates` that differ from the set's own, and with labels given as a
    `{label: [prompts]}` mapping, whose prompts are used as they are.
    """
    name = fields.get("template_set")
    if name is None:
        return
    templates = template_set(name)
    if isinstance(fields.get("labels"), Mapping):
        raise InvalidJobSpec(
            f"invalid job spec: template_set: {name!r} applies to a list of labels, but the labels are a "
            "{label: [prompts]} mapping whose prompts are used as they are; drop the template set or give a list of labels"
        )
    requested_templates = fields.get("templates")
    if requested_templates is not None and list(requested_templates) != templates:
        raise InvalidJobSpec(
            f"invalid job spec: both template_set {name!r} and templates were given; give one of them"
        )
