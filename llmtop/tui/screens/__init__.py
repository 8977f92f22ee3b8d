"""The app's screens: the fleet, one backend's details, help, and the drain confirmation."""
