"""pluristeer's serving side: pluralistic decoding and the Ray Serve application."""
