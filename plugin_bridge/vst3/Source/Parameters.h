// Parameters: named so that pedalboard exposes them as plain attributes. pedalboard appends a
// parameter's *label* to its Python name (gain_db with label "dB" would become gain_db_db), so no
// parameter here has a label: the unit is in the name (vocals_gain_db), as everywhere in unbake.
#pragma once

#include <juce_audio_processors/juce_audio_processors.h>

#include <array>
#include <string>

namespace unbake
{
// Stems with a gain and a mute. "accompaniment" is everything but vocals: for a model that has an
// accompaniment stem (spleeter-2stems) its own gain; for the others it scales every stem but vocals.
inline constexpr std::array<const char*, 7> kStemNames { "vocals", "drums", "bass", "other", "guitar", "piano",
                                                         "accompaniment" };
inline constexpr int kAccompaniment = 6;

// Models and presets offered by the "model" choice (presets/models.toml); index 0 is the default.
inline const juce::StringArray& modelChoices()
{
    static const juce::StringArray m { "spleeter-2stems", "htdemucs", "htdemucs_ft", "htdemucs_6s", "hdemucs_mmi" };
    return m;
}

inline constexpr float kMinGainDb = -60.0f, kMaxGainDb = 12.0f;

juce::AudioProcessorValueTreeState::ParameterLayout createParameterLayout();

juce::String gainId (int stem);
juce::String muteId (int stem);
inline const char* kModelId = "model";

// Properties of the state (not parameters): where the engine is, and how to start one there.
inline const char* kEndpointProperty = "endpoint";            // empty: defaultEndpoint()
inline const char* kEngineCommandProperty = "engine_command"; // path of the `unbake` executable
inline const char* kEngineCommandEnv = "UNBAKE_EXECUTABLE";   // else this; else no autostart
// The state's read-only child node (written by getStateInformation, ignored by setStateInformation):
// <engine_status connected="1|0" endpoint=".." model=".." device=".." line=".." latency_samples="N"
//                sample_rate="R" late_frames="N" stems="vocals,accompaniment"/>
inline const char* kStatusNode = "engine_status";

// The session the plugin opens: the engine's past-context rule (engine/apply.py, a live stream's
// rule; open request options of engine/protocol.py). Each 1 s segment (a quarter overlapping the
// next) is separated in a network window that reaches context_s back over audio already received
// (no latency) and lookahead_s past the segment's end, so the latency is about a segment plus the
// lookahead (spleeter-2stems: 55124 samples at 44.1 kHz, 60374 at 48 kHz) instead of the centred
// rule's 34 s; and a closed track equals a stream of it followed by silence, so a host's one-shot
// render equals Client.separate(audio, sr, model, **these options).
// tests/plugin_bridge/test_vst3.py (PLUGIN_OPTIONS) states the same four values.
struct SessionOption
{
    const char* name;
    double value;
};
inline constexpr std::array<SessionOption, 4> kSessionOptions { { { "segment_s", 1.0 },
                                                                  { "overlap", 0.25 },
                                                                  { "context_s", 4.0 },
                                                                  { "lookahead_s", 0.25 } } };

// In real time the plugin adds its own buffering to the engine's latency: the time the engine has
// to compute a segment once its window's last frame has come (spleeter-2stems' 5.9 s window: about
// 0.18 s on 2 desktop CPU cores, a few ms on a GPU). At least one block. With the options above the
// real-time latency stays under 1.5 s (44.1 kHz: 55124 + 10584 = 65708 samples, 1490 ms). The
// state's "realtime_margin_ms" overrides it (0 to 5000 ms: a GPU engine needs less, a slow CPU more).
inline constexpr double kRealtimeMarginS = 0.24;
inline constexpr double kMaxRealtimeMarginS = 5.0;
inline const char* kRealtimeMarginProperty = "realtime_margin_ms";

// Linear gain of a stem the model returns, from the parameters (not real-time: call off the audio
// thread or with the raw atomics, see PluginProcessor::stemGains).
int stemIndex (const std::string& name); // index in kStemNames, or -1
} // namespace unbake
