"""The synthetic demo data: `plan` (studies, patients, views and labels following the real frequencies),
`anatomy` + `signs` + `draw` (a radiograph with one visual sign per finding), `generate` (the CXR-LT layout)
and `layouts` (the NIH and PadChest layouts)."""
