"""Shared plumbing of the pipeline: the typed config, the shard format, Ray start-up and
the stage runner. Stage packages (curation, captioning, analysis, training) depend on this
package and never on each other's internals."""
