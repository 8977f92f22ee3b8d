"""Small widgets, each showing one part of a FleetView; they report upward with messages, never to each other."""
