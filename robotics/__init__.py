"""PEBBLE and bilevel PEBBLE on DeepMind Control walker_walk and Meta-World door-open (``robotics.train``)."""
