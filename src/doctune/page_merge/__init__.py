"""Page merge: the page adapter folded into full weights, checked on page images."""
