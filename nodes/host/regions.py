"""Host adapter: regional prompts as a key of ComfyUI conditioning (``krea2_regions``), handed to our model."""

from __future__ import annotations

from ...krea2_model.errors import ConditioningError
from ...krea2_model.model.regions import RegionalPrompts, make_region

KEY = "krea2_regions"


def add_regions(conditioning, pairs):
    """``conditioning`` (the base prompt) with the regions of ``pairs`` ``[(region name, CONDITIONING or None,
    mask name, MASK or None), ...]`` added to every entry (after any it already carries). A region without its
    mask, or a mask without its region, is an error naming the input."""
    if not conditioning:
        raise ConditioningError("Krea2RegionalPrompt: the conditioning input is empty.")
    width = conditioning[0][0].shape[-1]
    new = []
    for rname, region, mname, mask in pairs:
        if region is None and mask is None:
            continue
        if region is None or mask is None:
            given, missing = (rname, mname) if mask is None else (mname, rname)
            raise ConditioningError(f"Krea2RegionalPrompt: {given} is connected but {missing} is not; each region "
                                    "needs its prompt and its mask.")
        if len(region) != 1:
            raise ConditioningError(f"Krea2RegionalPrompt: {rname} holds {len(region)} conditionings; give one "
                                    "prompt per region (no Conditioning Combine).")
        new.append(make_region(region[0][0], mask, rname, width))
    if not new:
        raise ConditioningError("Krea2RegionalPrompt: connect at least one region and its mask (region_1 / mask_1).")
    out = []
    for cond, extra in conditioning:
        before = extra.get(KEY)
        regions = RegionalPrompts((tuple(before) if before is not None else ()) + tuple(new))
        out.append([cond, dict(extra, **{KEY: regions})])
    return out
