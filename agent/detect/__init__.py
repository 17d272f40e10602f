"""Object detection on the device: the numerics, pure and camera-free.

decode turns a detector's raw outputs into boxes in input-tensor pixels (boxes); geometry
maps them back onto the camera frame; zones keep the boxes whose object stands in a
polygon; tracker turns per-frame boxes into tracks with start/update/end events; gate
skips the detector on frames where nothing moved. Nothing here touches MQTT or onnxruntime.
"""
