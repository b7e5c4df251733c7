"""The wire format, shared by the server and the client and imported by nothing below them.

* :mod:`.tensors`: numpy arrays and Moments <-> Tensor / Moments messages;
* :mod:`.packed`: many layers' moments and statistics in one buffer per field
  (PackedMoments, PackedStats: a training step's UpdateStats);
* :mod:`.framing`: the large tensor of a Normalize call written into (and read
  out of) serialized bytes without protobuf's copies;
* :mod:`.messages`: protobuf messages <-> store values (configs, statistics,
  enum tables);
* :mod:`.status`: normsvc errors <-> gRPC status with rich details.
"""
