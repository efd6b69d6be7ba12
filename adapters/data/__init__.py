"""Datasets for petserve: the Example record, synthetic demo tasks and file loaders."""

from petserve.adapters.data.loaders import load_coco_captions, load_jsonl, load_vqav2
from petserve.adapters.data.records import TASKS, DataError, Example
from petserve.adapters.data.synthetic import (
    COLOR_RGB,
    COLORS,
    DEMO_TASKS,
    SHAPES,
    Scene,
    Shape,
    make_demo_examples,
    make_demo_scenes,
    make_demo_video_examples,
    render_scene,
    sample_scene,
    write_jsonl_dataset,
    write_video,
)

__all__ = [
    "COLOR_RGB",
    "COLORS",
    "DEMO_TASKS",
    "SHAPES",
    "TASKS",
    "DataError",
    "Example",
    "Scene",
    "Shape",
    "load_coco_captions",
    "load_jsonl",
    "load_vqav2",
    "make_demo_examples",
    "make_demo_scenes",
    "make_demo_video_examples",
    "render_scene",
    "sample_scene",
    "write_jsonl_dataset",
    "write_video",
]
