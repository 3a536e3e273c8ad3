"""From radiographs to masks: the two-stage chain (`chain`: global model, palm box, upscaler,
palm model, fusion), probabilities resized back (`upsample`), the calibration record it reads
(`calibration`), the `infer` command and saved probabilities (`probs`), the exported chain
(`export`, `onnx_backend`) and pseudo-labels made with it (`pseudo`)."""
