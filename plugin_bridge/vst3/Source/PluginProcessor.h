#pragma once

#include "EngineClient.h"
#include "Parameters.h"
#include "Status.h"

#include <juce_audio_processors/juce_audio_processors.h>

#include <array>
#include <atomic>
#include <mutex>
#include <thread>

namespace unbake
{
class UnbakeProcessor final : public juce::AudioProcessor
{
public:
    // an offline (non-real-time) block waits at most this long for its stems
    static constexpr double kOfflineWaitS = 30.0;
    static constexpr int kOpenTimeoutMs = 60000;
    static constexpr double kRetryS = 2.0;  // after a failed open, the same open is not retried sooner

    UnbakeProcessor();
    ~UnbakeProcessor() override;

    void prepareToPlay (double sampleRate, int samplesPerBlock) override;
    void releaseResources() override;
    void reset() override;
    bool isBusesLayoutSupported (const BusesLayout& layouts) const override;
    void processBlock (juce::AudioBuffer<float>&, juce::MidiBuffer&) override;
    using AudioProcessor::processBlock;

    juce::AudioProcessorEditor* createEditor() override;
    bool hasEditor() const override { return true; }

    const juce::String getName() const override { return "unbake"; }
    bool acceptsMidi() const override { return false; }
    bool producesMidi() const override { return false; }
    bool isMidiEffect() const override { return false; }
    double getTailLengthSeconds() const override { return 0.0; }

    int getNumPrograms() override { return 1; }
    int getCurrentProgram() override { return 0; }
    void setCurrentProgram (int) override {}
    const juce::String getProgramName (int) override { return {}; }
    void changeProgramName (int, const juce::String&) override {}

    void getStateInformation (juce::MemoryBlock& destData) override;
    void setStateInformation (const void* data, int sizeInBytes) override;

    std::string endpoint() const;   // the state's endpoint, else defaultEndpoint()
    std::string status() const { return engine.status(); }
    int64_t lateFrames() const noexcept { return late.load(); }
    EngineStatus engineStatus() const; // message thread (see Status.h)

    // P2 stub: the editor's access to the parameters and the settings (replaced at merge by the
    // processor owner's versions)
    juce::AudioProcessorValueTreeState& parameters() noexcept { return params; }
    void setEndpoint (const juce::String& e);
    juce::String endpointSetting() const;
    void setEngineCommand (const juce::String& c);
    juce::String engineCommandSetting() const;

private:
    void openSession (double sampleRate, int channels);
    void sessionLoop();
    void computeGains (float* gains) const noexcept;
    void renderOffline (juce::AudioBuffer<float>& buffer);
    void renderRealtime (juce::AudioBuffer<float>& buffer);
    void outputStems (juce::AudioBuffer<float>& buffer, int start, int n, const float* gains, bool wait,
                      double deadlineMs);

    juce::AudioProcessorValueTreeState params;
    EngineClient engine;

    std::atomic<float>* modelParam = nullptr;
    std::array<std::atomic<float>*, kStemNames.size()> gainParam {}, muteParam {};

    // the session (written off the audio thread while it is stopped)
    bool sessionOk = false, hasAccompanimentStem = false;
    int sessionModel = -1, sessionChannels = 0, numStems = 0;
    double sessionRate = 0;
    std::string sessionEndpoint;
    std::array<int, EngineClient::kMaxStems> stemParamIndex {};
    int64_t framesPushed = 0;
    double lastFailMs = 0; // the last open (good or not); these session fields: under sessionMutex
    std::atomic<bool> needsNewSession { false }, active { false };
    std::mutex sessionMutex; // one openSession at a time (prepare, layout check, offline block, sessionLoop)
    std::atomic<bool> quitSessionThread { false };
    mutable std::mutex infoMutex;      // P2 stub: the last open's answer, for engineStatus()
    EngineClient::SessionInfo lastInfo; // P2 stub
    std::thread sessionThread; // last: started when everything above exists

    // stream position (audio thread)
    int64_t preRollLeft = 0;   // output frames of silence before stem frame 0 (the reported latency)
    int64_t debt = 0;          // stem frames owed: replaced by silence when late, dropped when they come
    std::atomic<int64_t> late { 0 };

    JUCE_DECLARE_NON_COPYABLE_WITH_LEAK_DETECTOR (UnbakeProcessor)
};
} // namespace unbake
