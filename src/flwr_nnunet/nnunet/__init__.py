"""The nnU-Net side, usable without Flower: networks from plans, planning, checkpoint I/O, the model folder."""
