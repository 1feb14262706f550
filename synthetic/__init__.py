"""The synthetic world: procedural scenes with exact descriptions (scenes), LAION- and
SA-1B-shaped samples drawn from them (samples, sa1b), served over a loopback HTTP server
(generated, loopback), and a compact way to move a synthetic dataset (portable).

It sits just above shardkit: every stage package may use it (curation reads its sources,
captioning and analysis check captions against its ground truth, training builds its
encoders' corpora from its grammar), and it imports none of them.
"""
