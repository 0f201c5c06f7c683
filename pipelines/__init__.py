"""pluristeer's Ray jobs and what feeds them: data loaders, collection, training, vectors, evaluation."""
